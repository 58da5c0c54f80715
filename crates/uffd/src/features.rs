//! userfaultfd feature bits, with names, so that "what the kernel lacks" can be said plainly.

use linux_raw_sys::general as uapi;

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(pub u64);

macro_rules! features {
    ($($name:ident = $bit:expr, $text:literal;)*) => {
        impl Features {
            $(pub const $name: Features = Features($bit as u64);)*
            /// Every feature this crate knows, with its name.
            pub const ALL: &'static [(Features, &'static str)] = &[$((Features::$name, $text)),*];
        }
    };
}

features! {
    PAGEFAULT_FLAG_WP = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP";
    EVENT_FORK = uapi::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK";
    EVENT_REMAP = uapi::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP";
    EVENT_REMOVE = uapi::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE";
    MISSING_HUGETLBFS = uapi::UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS";
    MISSING_SHMEM = uapi::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM";
    EVENT_UNMAP = uapi::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP";
    SIGBUS = uapi::UFFD_FEATURE_SIGBUS, "SIGBUS";
    THREAD_ID = uapi::UFFD_FEATURE_THREAD_ID, "THREAD_ID";
    MINOR_HUGETLBFS = uapi::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS";
    MINOR_SHMEM = uapi::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM";
    EXACT_ADDRESS = uapi::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS";
    WP_HUGETLBFS_SHMEM = uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM";
    WP_UNPOPULATED = uapi::UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED";
    POISON = uapi::UFFD_FEATURE_POISON, "POISON";
    WP_ASYNC = uapi::UFFD_FEATURE_WP_ASYNC, "WP_ASYNC";
    MOVE = uapi::UFFD_FEATURE_MOVE, "MOVE";
}

impl Features {
    /// No features.
    pub const NONE: Features = Features(0);

    /// Whether every bit of `other` is in `self`.
    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits of `self` that are not in `other`.
    pub fn without(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }

    /// Names of the bits set, unknown bits as hex.
    pub fn names(self) -> Vec<String> {
        let mut names: Vec<String> = Features::ALL
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| (*n).to_string())
            .collect();
        let known = Features::ALL.iter().fold(0, |acc, (f, _)| acc | f.0);
        if self.0 & !known != 0 {
            names.push(format!("{:#x}", self.0 & !known));
        }
        names
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        f.write_str(&self.names().join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_and_names() {
        let set = Features::MISSING_SHMEM | Features::THREAD_ID;
        assert!(set.contains(Features::THREAD_ID));
        assert!(!set.contains(Features::MOVE));
        assert_eq!(set.without(Features::THREAD_ID), Features::MISSING_SHMEM);
        assert_eq!(set.to_string(), "MISSING_SHMEM | THREAD_ID");
        assert_eq!(Features(1 << 40).names(), vec!["0x10000000000".to_string()]);
        assert_eq!(Features::NONE.to_string(), "none");
    }

    #[test]
    fn the_known_features_are_bits_0_to_16() {
        let all = Features::ALL
            .iter()
            .fold(Features::NONE, |acc, (f, _)| acc | *f);
        assert_eq!(all, Features(0x1ffff));
    }
}
