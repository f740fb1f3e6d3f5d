"""Data layer. A data source yields labeled `manifest.ManifestRow`s and is picked by
`data.kind` through `sources` (`register_source`, `get_source`): ESC-50 (`esc50`), its
synthetic twin (`synthetic`) and labeled uploads (`uploads`, train only). `cache` decodes
rows into int16 memmaps, `datasets` reads them as batches, `datamodule` wires it all into
Lightning. Kept light: import the submodule you need (datamodule and datasets import torch)."""
