//! Checking qcow2 refcounts against the references of the L1/L2 tables.
