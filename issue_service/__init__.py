"""The issue service: companies, issues, checkout and execution locks, comments, audit."""
