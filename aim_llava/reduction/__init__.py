"""Visual-token reduction, no model code: the interfaces the model calls (``tokens``, ``plan``),
the algorithms (``merge``, ``importance``, ``schedule``), the methods and their registry
(``methods``), and configs and presets (``config``)."""
