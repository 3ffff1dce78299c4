"""The Hugging Face remote code a `format=hf` export ships: a Baton model for `AutoModelForCausalLM.from_pretrained(
dir, trust_remote_code=True)` on a machine with only torch and transformers. The exporter copies every module here
but this one into the export, flat, so the modules import nothing but torch, transformers and each other (as
`from .baton_layers import ...`, the form transformers follows); this file only makes the folder a package for the
tests."""
