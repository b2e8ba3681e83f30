"""The ops of pyrl, one module per family: validation, backend choice and the reference body."""
