"""Pure operations, each a ``<op>_forward`` / ``<op>_backward`` pair with a typed cache."""
