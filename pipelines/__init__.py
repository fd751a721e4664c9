"""scdgm pipelines: data in, QC, training, tuning, tracking and the `scdgm` command line."""
