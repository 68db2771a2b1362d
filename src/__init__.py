"""The trial process: everything that imports torch lives here."""
