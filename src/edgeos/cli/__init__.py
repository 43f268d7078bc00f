"""The ``edgeos`` command: thin wrappers that call the library and report errors."""
