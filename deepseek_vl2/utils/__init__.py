"""Helpers that do not depend on the model code (see `deepseek_vl2.utils.io`)."""
