//! Replicated registers: the state behind the `Kv` service, and the simplest command path
//! through Raft (what the load tool measures against etcd's put).

use std::collections::BTreeMap;

use bytes::Bytes;

/// Largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// A register's value and the index of the entry that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    /// The value.
    pub value: Bytes,
    /// Log index of the write.
    pub modified_index: u64,
}

/// All registers, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvState {
    registers: BTreeMap<Bytes, Register>,
}

impl KvState {
    /// Sets `key`; returns true if it existed.
    pub fn put(&mut self, key: Bytes, value: Bytes, index: u64) -> bool {
        self.registers
            .insert(
                key,
                Register {
                    value,
                    modified_index: index,
                },
            )
            .is_some()
    }

    /// Deletes `key`; returns true if it existed.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        self.registers.remove(key).is_some()
    }

    /// The register at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Register> {
        self.registers.get(key)
    }

    /// Every register in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &Register)> {
        self.registers.iter()
    }

    /// Number of registers.
    pub fn len(&self) -> usize {
        self.registers.len()
    }

    /// True if there is no register.
    pub fn is_empty(&self) -> bool {
        self.registers.is_empty()
    }
}

/// Checks a key against the documented bounds, with a message a person can act on.
pub fn validate_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() {
        return Err("key must not be empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    Ok(())
}

/// Checks a value against the documented bound.
pub fn validate_value(value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes; the limit is {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    Ok(())
}
