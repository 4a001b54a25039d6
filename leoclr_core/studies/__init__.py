"""Experiments that test the method's claims on the built-in data (`crop_semantics`)."""
