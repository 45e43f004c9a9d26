//! GNU as (AT&T) assembly diff: the `kpatch_gensrc` job.
