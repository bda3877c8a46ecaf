"""The commands behind ``tools/*.py``: one module per tool, each with ``main(argv) -> int`` (its parser,
its checks, the run and what it prints). The tools are thin entry points over these; nothing imports
``tools/``."""
