"""Curation: label rules, min/max per class and the stored, item-grouped stratified split.

A catalog goes in, a :class:`~prodclass.curate.rules.Dataset` (curated rows, class map, split)
comes out; later: duplicates, secondary-image fill and label issues.
"""
