"""Authors and their books; `Author.email` is the column the masking policy masks."""

from __future__ import annotations

from django.db import models


class Author(models.Model):
    name = models.TextField()
    email = models.TextField(unique=True)
    updated_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "django_app"


class Book(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    title = models.CharField(max_length=200, db_index=True)
    pages = models.IntegerField(null=True)
    updated_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "django_app"
        indexes = (models.Index(fields=("author", "title"), name="book_author_title"),)
