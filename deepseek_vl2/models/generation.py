"""Token generation (filled in below)."""


class GenerationMixin:
    pass
