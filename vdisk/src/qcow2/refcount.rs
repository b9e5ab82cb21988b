//! Reference counts.
