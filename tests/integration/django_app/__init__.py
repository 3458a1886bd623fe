"""A small Django app whose migrations the proxy tests run (issue 10): models with a foreign key
and an index, and a RunSQL migration that adds the standard `updated_at` trigger."""
