"""Distillation: the router (cache or live teacher per batch), teacher targets, channel adapters, the
geometry that resamples teacher maps onto the student grid, the losses and the output pairings.
It sits above core, models, teachers and datasets and below the engine."""
