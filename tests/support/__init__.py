"""Test-side helpers shared by several test folders (fault injection through the product's public seams)."""
