"""One loss per module; each documents its shapes and the paper it implements."""
