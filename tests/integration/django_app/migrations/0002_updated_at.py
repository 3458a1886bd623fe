"""The standard `updated_at` trigger, in raw SQL (Django has no operation for triggers)."""

from __future__ import annotations

from django.db import migrations

FUNCTION = """
CREATE OR REPLACE FUNCTION django_app_set_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
"""

TRIGGER = """
CREATE TRIGGER book_updated_at BEFORE UPDATE ON django_app_book
FOR EACH ROW EXECUTE FUNCTION django_app_set_updated_at();
"""


class Migration(migrations.Migration):
    dependencies = (("django_app", "0001_initial"),)

    operations = (
        migrations.RunSQL(FUNCTION, reverse_sql="DROP FUNCTION django_app_set_updated_at();"),
        migrations.RunSQL(TRIGGER, reverse_sql="DROP TRIGGER book_updated_at ON django_app_book;"),
        migrations.RunSQL(
            "ALTER TABLE django_app_book ADD CONSTRAINT book_pages_positive CHECK (pages > 0);",
            reverse_sql="ALTER TABLE django_app_book DROP CONSTRAINT book_pages_positive;",
        ),
    )
