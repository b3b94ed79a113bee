"""Fixture: fails at import."""
raise ImportError("fixture import_error: no module named 'not_installed_kernel_lib'")
