//! Audio signal processing for the gateway (work in progress).
