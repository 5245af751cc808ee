"""Knowledge about datasets that several layers share (languages, file layouts, readers).

This package sits at the utils level: it imports only `mst5_jax.utils`, so `tasks/`
(training data), `mst5_jax.evals` (which may import only utils-level modules) and the
vocabulary caller can all use it.
"""
