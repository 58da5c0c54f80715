//! The CPUID a vCPU sees: what KVM supports, plus the KVM paravirtual leaves, with the
//! async-page-fault features on by default and an optional mask of features to hide.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// KVM's paravirtual signature leaf ("KVMKVMKVM\0\0\0").
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// KVM's paravirtual feature leaf.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// KVM_FEATURE_ASYNC_PF: "page not present" / "page ready" async page faults.
pub const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
/// KVM_FEATURE_ASYNC_PF_VMEXIT: async PF delivered while the guest is in a nested VM exit.
pub const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
/// KVM_FEATURE_ASYNC_PF_INT: "page ready" delivered as an interrupt.
pub const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
/// All three async-page-fault bits.
pub const ASYNC_PF_FEATURES: u32 =
    KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A named CPU feature that `--cpuid-mask` can hide.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub index: u32,
    pub reg: Reg,
    pub bit: u32,
}

const fn feature(name: &'static str, leaf: u32, index: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        index,
        reg,
        bit,
    }
}

/// Features that can be masked, by name.
pub const FEATURES: &[Feature] = &[
    feature("pclmulqdq", 1, 0, Reg::Ecx, 1),
    feature("ssse3", 1, 0, Reg::Ecx, 9),
    feature("fma", 1, 0, Reg::Ecx, 12),
    feature("cx16", 1, 0, Reg::Ecx, 13),
    feature("pcid", 1, 0, Reg::Ecx, 17),
    feature("sse4.1", 1, 0, Reg::Ecx, 19),
    feature("sse4.2", 1, 0, Reg::Ecx, 20),
    feature("x2apic", 1, 0, Reg::Ecx, 21),
    feature("movbe", 1, 0, Reg::Ecx, 22),
    feature("popcnt", 1, 0, Reg::Ecx, 23),
    feature("tsc-deadline", 1, 0, Reg::Ecx, 24),
    feature("aes", 1, 0, Reg::Ecx, 25),
    feature("xsave", 1, 0, Reg::Ecx, 26),
    feature("osxsave", 1, 0, Reg::Ecx, 27),
    feature("avx", 1, 0, Reg::Ecx, 28),
    feature("f16c", 1, 0, Reg::Ecx, 29),
    feature("rdrand", 1, 0, Reg::Ecx, 30),
    feature("avx2", 7, 0, Reg::Ebx, 5),
    feature("bmi1", 7, 0, Reg::Ebx, 3),
    feature("bmi2", 7, 0, Reg::Ebx, 8),
    feature("avx512f", 7, 0, Reg::Ebx, 16),
    feature("avx512dq", 7, 0, Reg::Ebx, 17),
    feature("rdseed", 7, 0, Reg::Ebx, 18),
    feature("adx", 7, 0, Reg::Ebx, 19),
    feature("avx512cd", 7, 0, Reg::Ebx, 28),
    feature("avx512bw", 7, 0, Reg::Ebx, 30),
    feature("avx512vl", 7, 0, Reg::Ebx, 31),
];

/// Presets accepted by `--cpuid-mask` besides single feature names.
pub const PRESETS: &[(&str, &[&str])] = &[(
    // What an instruction-emulating KVM (such as kvm_pvm) cannot execute.
    "emulator",
    &[
        "cx16", "xsave", "osxsave", "avx", "avx2", "f16c", "fma", "avx512f", "avx512dq",
        "avx512cd", "avx512bw", "avx512vl",
    ],
)];

/// Errors building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// A `--cpuid-mask` entry names no known feature or preset.
    #[error("unknown CPU feature {0:?} in the CPUID mask (known: {known}, or preset \"emulator\")", known = FEATURES.iter().map(|f| f.name).collect::<Vec<_>>().join(", "))]
    UnknownFeature(String),
}

/// A set of features to hide from the guest.
#[derive(Debug, Clone, Default)]
pub struct FeatureMask(Vec<Feature>);

impl FeatureMask {
    /// Parses a comma-separated list of feature names and presets.
    pub fn parse(list: &str) -> Result<Self, CpuidError> {
        let mut features = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Some((_, names)) = PRESETS.iter().find(|(p, _)| *p == name) {
                features.extend(
                    names
                        .iter()
                        .map(|n| lookup(n).expect("presets name known features")),
                );
            } else {
                features.push(lookup(name).ok_or_else(|| CpuidError::UnknownFeature(name.into()))?);
            }
        }
        Ok(FeatureMask(features))
    }

    /// The names of the hidden features.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|f| f.name).collect()
    }
}

fn lookup(name: &str) -> Option<Feature> {
    FEATURES
        .iter()
        .copied()
        .find(|f| f.name.eq_ignore_ascii_case(name))
}

/// What to offer on top of KVM's supported CPUID.
#[derive(Debug, Clone)]
pub struct CpuidConfig {
    /// Offer KVM's async-page-fault features (CPUID 0x40000001 eax bits 4, 10, 14).
    pub async_pf: bool,
    /// Features to hide.
    pub mask: FeatureMask,
}

impl Default for CpuidConfig {
    fn default() -> Self {
        CpuidConfig {
            async_pf: true,
            mask: FeatureMask::default(),
        }
    }
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// A digest of the CPUID KVM supports on this host: two hosts with different digests would show
/// a guest different CPU features, so a VM must not move between them.
pub fn host_digest(kvm: &kvm_ioctls::Kvm) -> Result<u32, kvm_ioctls::Error> {
    let supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    // The current CPU's APIC id shows through (leaf 1 EBX[31:24], leaves 0xB and 0x1F EDX):
    // it is not a feature, and it differs from CPU to CPU of one host.
    let mut entries: Vec<_> = supported
        .as_slice()
        .iter()
        .map(|e| {
            let ebx = if e.function == 1 {
                e.ebx & 0x00ff_ffff
            } else {
                e.ebx
            };
            let edx = if matches!(e.function, 0xb | 0x1f) {
                0
            } else {
                e.edx
            };
            (e.function, e.index, e.eax, ebx, e.ecx, edx)
        })
        .collect();
    entries.sort_unstable();
    let mut digest: u32 = 0x811c_9dc5;
    for (function, index, eax, ebx, ecx, edx) in entries {
        for word in [function, index, eax, ebx, ecx, edx] {
            for byte in word.to_le_bytes() {
                digest = (digest ^ u32::from(byte)).wrapping_mul(0x0100_0193);
            }
        }
    }
    Ok(digest)
}

/// Adjusts KVM's supported CPUID for vCPU `vcpu_id` of `vcpu_count`.
pub fn customize(cpuid: &mut CpuId, config: &CpuidConfig, vcpu_id: u8, vcpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // Initial APIC id and logical processor count; the hypervisor bit.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_id) << 24)
                    | (u32::from(vcpu_count) << 16);
                entry.ecx |= 1 << 31;
            }
            0xb | 0x1f => entry.edx = u32::from(vcpu_id),
            KVM_SIGNATURE_LEAF => {
                entry.eax = KVM_FEATURES_LEAF;
                entry.ebx = u32::from_le_bytes(*b"KVMK");
                entry.ecx = u32::from_le_bytes(*b"VMKV");
                entry.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            KVM_FEATURES_LEAF => {
                if config.async_pf {
                    entry.eax |= ASYNC_PF_FEATURES;
                } else {
                    entry.eax &= !ASYNC_PF_FEATURES;
                }
            }
            _ => {}
        }
        for feature in &config.mask.0 {
            if entry.function == feature.leaf && entry.index == feature.index {
                *reg_mut(entry, feature.reg) &= !(1 << feature.bit);
            }
        }
    }
}

/// Finds the entry for `leaf` / `index`.
pub fn entry(cpuid: &CpuId, leaf: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .copied()
        .find(|e| e.function == leaf && e.index == index)
}

#[cfg(test)]
mod digest_tests {
    use super::host_digest;

    /// Runs `f` on host CPU `cpu`.
    fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE on any machine this runs on.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: pins the calling thread (pid 0) to the set just built.
        let pinned =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        assert_eq!(pinned, 0, "cannot pin to CPU {cpu}");
        f()
    }

    #[test]
    fn the_host_digest_is_the_same_on_every_cpu() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let digests: Vec<u32> = (0..cpus.min(4))
            .map(|cpu| {
                let kvm = &kvm;
                std::thread::scope(|s| {
                    s.spawn(move || on_cpu(cpu, || host_digest(kvm).unwrap()))
                        .join()
                        .unwrap()
                })
            })
            .collect();
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:x?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: (1 << 13) | (1 << 26) | (1 << 28),
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_SIGNATURE_LEAF,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_FEATURES_LEAF,
                eax: 0x1,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn async_pf_on_by_default() {
        let mut cpuid = sample();
        customize(&mut cpuid, &CpuidConfig::default(), 0, 1);
        let kvm = entry(&cpuid, KVM_FEATURES_LEAF, 0).unwrap();
        assert_eq!(kvm.eax & ASYNC_PF_FEATURES, ASYNC_PF_FEATURES);
        assert_eq!(kvm.eax & 1, 1, "other KVM features are kept");
    }

    #[test]
    fn async_pf_can_be_turned_off() {
        let mut cpuid = sample();
        entry_mut(&mut cpuid, KVM_FEATURES_LEAF).eax |= ASYNC_PF_FEATURES;
        let config = CpuidConfig {
            async_pf: false,
            ..Default::default()
        };
        customize(&mut cpuid, &config, 0, 1);
        assert_eq!(
            entry(&cpuid, KVM_FEATURES_LEAF, 0).unwrap().eax & ASYNC_PF_FEATURES,
            0
        );
    }

    fn entry_mut(cpuid: &mut CpuId, leaf: u32) -> &mut kvm_cpuid_entry2 {
        cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == leaf)
            .unwrap()
    }

    #[test]
    fn apic_id_and_signature() {
        let mut cpuid = sample();
        customize(&mut cpuid, &CpuidConfig::default(), 3, 4);
        let leaf1 = entry(&cpuid, 1, 0).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        let sig = entry(&cpuid, KVM_SIGNATURE_LEAF, 0).unwrap();
        let mut text = Vec::new();
        for reg in [sig.ebx, sig.ecx, sig.edx] {
            text.extend_from_slice(&reg.to_le_bytes());
        }
        assert_eq!(&text[..9], b"KVMKVMKVM");
    }

    #[test]
    fn mask_hides_named_features() {
        let mut cpuid = sample();
        let config = CpuidConfig {
            mask: FeatureMask::parse("cx16, avx").unwrap(),
            ..Default::default()
        };
        customize(&mut cpuid, &config, 0, 1);
        let ecx = entry(&cpuid, 1, 0).unwrap().ecx;
        assert_eq!(ecx & (1 << 13), 0);
        assert_eq!(ecx & (1 << 28), 0);
        assert_ne!(ecx & (1 << 26), 0, "xsave was not asked for");
    }

    #[test]
    fn emulator_preset_and_unknown_names() {
        let mask = FeatureMask::parse("emulator").unwrap();
        assert!(mask.names().contains(&"cx16"));
        assert!(mask.names().contains(&"xsave"));
        let err = FeatureMask::parse("cx16,warp-drive").unwrap_err();
        assert!(err.to_string().contains("warp-drive"));
    }
}
