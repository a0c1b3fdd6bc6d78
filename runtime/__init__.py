"""v4c's lean runtime: opens and verifies artifacts and executes their kernel lists.

It imports nothing from the compiler (v4c.frontend, v4c.ir, v4c.passes, v4c.targets, ...);
`tests/test_layering.py` enforces that.
"""
