"""Hugging Face checkpoints in and out: one name table per architecture (architectures.py) read both ways, the
import of Llama / Mistral / Qwen2 / Qwen3 directories (importer.py), and the export of any Baton model as a
directory `transformers` loads (exporter.py; remote/ holds the self-contained modeling code it ships)."""
