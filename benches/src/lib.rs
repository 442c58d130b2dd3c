//! Criterion benchmarks of Tally; they need no services.
