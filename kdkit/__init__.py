"""kdkit: knowledge and dataset distillation."""
