"""Everything under the state directory: where each file lives (``layout``), what it holds (``models``),
and the one module that reads and writes it (``files``)."""
