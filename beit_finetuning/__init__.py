"""End-to-end ImageNet fine-tuning of SLIP / CLIP / SimCLR image towers with the BEiT recipe (see README.md)."""
