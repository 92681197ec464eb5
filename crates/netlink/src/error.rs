//! The crate's error type: each variant names the operation and the object it acted on.

/// Errors from netlink requests, namespace handling and sysctl writes.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel (or a system call) refused an operation.
    #[error("{op} {object}: {cause}")]
    Kernel {
        /// What was being done, e.g. `adding veth`.
        op: &'static str,
        /// The object and its namespace, e.g. `lxc0a1b in netns sigil-x`.
        object: String,
        /// The error, as an OS error when the kernel gave an errno.
        cause: std::io::Error,
    },
    /// A link an operation refers to does not exist.
    #[error("{op}: no link {link} in {ns}")]
    NoSuchLink {
        /// What was being done.
        op: &'static str,
        /// The missing link.
        link: String,
        /// Its namespace.
        ns: String,
    },
    /// A named namespace to create exists already.
    #[error("network namespace {name} already exists")]
    NetnsExists {
        /// The namespace name.
        name: String,
    },
    /// An argument is malformed.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
}

impl NetlinkError {
    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        reason: impl ToString,
    ) -> Self {
        Self::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn kernel(op: &'static str, object: impl ToString, source: std::io::Error) -> Self {
        Self::Kernel {
            op,
            object: object.to_string(),
            cause: source,
        }
    }

    /// The errno behind a kernel error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { cause: source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
