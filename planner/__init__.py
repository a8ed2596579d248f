"""Stage 2: statistics + FLOP budget -> cache plan. numpy/scipy only: never imports torch."""
