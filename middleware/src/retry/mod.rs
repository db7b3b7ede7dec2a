//! Placeholder: this middleware is being written.
