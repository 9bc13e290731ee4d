"""In-context regression prompts (`ICLTask`) and seeded samplers."""

from mi_krr.tasks.task import ICLTask

__all__ = ["ICLTask"]
