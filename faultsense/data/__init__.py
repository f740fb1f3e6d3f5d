"""Data layer: ESC-50 source and mapping (esc50), waveform cache (cache), the Lightning
DataModule (datamodule), labeled uploads (uploads) and a synthetic ESC-50-layout set
(synthetic). Kept light: import the submodule you need (datamodule imports torch)."""
