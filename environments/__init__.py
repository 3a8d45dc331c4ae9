"""Text environments and tools. Knows nothing of models, tokens or training.

Importing this package is cheap: env modules register by string entry point and are imported
only when `make` builds one.
"""

from environments.base import TextEnv, check_env, make, register, registered_ids

__all__ = ["TextEnv", "check_env", "make", "register", "registered_ids"]
