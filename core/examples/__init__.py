"""Small end-to-end tasks that exercise the whole core stack (used by the demo and tests)."""
