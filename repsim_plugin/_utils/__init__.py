"""Machinery shared inside the package (not public API): parameter and input checks, batch plumbing, atomic
files and safe loading, plotting scaffolding, warning stack levels, name suggestions, torch.distributed helpers.

Modules here import nothing from the rest of the package except ``repsim_plugin.errors``, so any module may use
them without creating an import cycle.
"""
