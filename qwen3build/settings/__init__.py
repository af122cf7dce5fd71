"""Stage 1: what the user asked for (settings, recipes, layout) and what the checkpoint is
(config.json). Pure data and validation: nothing here reads weights or writes files."""
