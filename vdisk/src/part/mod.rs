//! Partition tables (MBR with logical partitions, GPT). Not implemented yet.
