"""Command-line entry points (click): thin layers that parse, call the library and render."""
