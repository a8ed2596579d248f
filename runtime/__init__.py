"""Stage 3: load a cache plan and run it inside ordinary diffusers pipelines.

Owns the plan schema and the unit registry. Light: torch + pyyaml, never scipy. Heavy names are imported
lazily so that ``cachec.runtime.plan`` (the schema) can be used without importing torch.
"""
