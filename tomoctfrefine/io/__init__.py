"""RELION file input/output: optimisation sets, tomogram sets (v4/v5), particles, trajectories,
maps and FSC tables. RELION column names live only in this package."""
