//! The doctor's checks of Hypervisor.framework (macOS). What the Mac
//! says is gathered into [`Facts`] there; the verdicts, with a fix for
//! each problem, are plain logic, tested on Linux too.

use super::Status;

/// What the Mac says about itself.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `kern.osproductversion`, e.g. "15.2".
    pub os_version: Option<String>,
    /// `machdep.cpu.brand_string`, e.g. "Apple M3 Pro".
    pub chip: Option<String>,
    /// `kern.hv_support`: the hypervisor is offered to programs.
    pub hv_support: bool,
    /// `kern.hv_vmm_present`: this macOS itself runs inside a VM.
    pub in_vm: bool,
    /// Creating (and destroying) a VM: fails without the entitlement.
    pub vm_create: Result<(), String>,
}

/// The oldest macOS the backend runs on: its platform GIC and GIC state
/// API came with macOS 15.
pub const MIN_MACOS: u32 = 15;

fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

/// The M generation of an Apple chip ("Apple M3 Pro" is 3).
fn generation(chip: &str) -> Option<u32> {
    let rest = chip.strip_prefix("Apple M")?;
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

const SIGN: &str = "sign the binary with the entitlement: codesign --sign - --force \
                    --entitlements tools/macos/vmm.entitlements $(which vmm)";

/// The checks' lines: (name, detail, status).
pub fn verdicts(f: &Facts) -> Vec<(&'static str, String, Status)> {
    let mut out = Vec::new();
    let version = f.os_version.clone().unwrap_or_else(|| "unknown".into());
    out.push(match f.os_version.as_deref().and_then(major) {
        Some(m) if m >= MIN_MACOS => ("macOS", version, Status::Ok),
        Some(_) => (
            "macOS",
            version,
            Status::Fail(format!(
                "update to macOS {MIN_MACOS} or later: the VMM uses the platform interrupt \
                 controller (hv_gic_create) and its saved state, which came with it"
            )),
        ),
        None => ("macOS", version, Status::Info),
    });
    let chip = f.chip.clone().unwrap_or_else(|| "unknown".into());
    let generation = f.chip.as_deref().and_then(generation);
    out.push(match (&f.chip, generation) {
        (Some(c), None) if !c.starts_with("Apple") => (
            "chip",
            chip,
            Status::Fail(
                "the VMM needs Apple silicon (M1 or later); Intel Macs are not supported".into(),
            ),
        ),
        _ => ("chip", chip, Status::Info),
    });
    let nested_hint = "nested virtualization needs an M3 or later host on macOS 15 or later, with \
                       it turned on for the outer VM (Virtualization.framework: \
                       VZGenericPlatformConfiguration.isNestedVirtualizationEnabled)";
    if f.in_vm {
        out.push((
            "nested virtualization",
            match f.hv_support {
                true => "this macOS runs inside a VM that passes virtualization through".into(),
                false => "this macOS runs inside a VM without virtualization".into(),
            },
            match (f.hv_support, generation) {
                (true, _) => Status::Ok,
                (false, Some(g)) if g < 3 => Status::Fail(format!(
                    "an M{g} cannot run a VM inside a VM; run the VMM on the Mac itself ({nested_hint})"
                )),
                (false, _) => Status::Fail(nested_hint.into()),
            },
        ));
    }
    if !f.hv_support {
        if !f.in_vm {
            out.push((
                "Hypervisor.framework",
                "not offered (sysctl kern.hv_support is 0)".into(),
                Status::Fail("the VMM needs an Apple silicon Mac with virtualization".into()),
            ));
        }
        return out;
    }
    out.push((
        "Hypervisor.framework",
        "offered (kern.hv_support)".into(),
        Status::Ok,
    ));
    out.push(match &f.vm_create {
        Ok(()) => (
            "entitlement",
            "a VM can be created: the binary has com.apple.security.hypervisor".into(),
            Status::Ok,
        ),
        Err(e) if e.contains("HV_DENIED") => (
            "entitlement",
            "missing: macOS refuses to create a VM for this binary".into(),
            Status::Fail(SIGN.into()),
        ),
        Err(e) => (
            "creating a VM",
            e.clone(),
            Status::Fail(
                "see above; `vmm doctor` on a Mac that works prints the difference".into(),
            ),
        ),
    });
    out
}

/// Gathers the facts and adds the checks; the hypervisor's kind when a
/// VM can be made.
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub fn checks(report: &mut super::Report) -> Option<hypervisor::HypervisorKind> {
    use hypervisor::hvf::backend::{sysctl_string, sysctl_u32, HvfHypervisor};
    use hypervisor::Hypervisor;
    let hv = HvfHypervisor::new();
    let facts = Facts {
        os_version: sysctl_string(c"kern.osproductversion"),
        chip: sysctl_string(c"machdep.cpu.brand_string"),
        hv_support: sysctl_u32(c"kern.hv_support") == Some(1),
        in_vm: sysctl_u32(c"kern.hv_vmm_present") == Some(1),
        vm_create: match &hv {
            Ok(hv) => hv.probe().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    let lines = verdicts(&facts);
    let usable = lines.iter().all(|(_, _, s)| !matches!(s, Status::Fail(_)));
    for (name, detail, status) in lines {
        report.push(name, detail, status);
    }
    let hv = hv.ok().filter(|_| usable)?;
    report.push(
        "max vCPUs per VM",
        hv.max_vcpus().min(crate::arch::max_vcpus()).to_string(),
        Status::Info,
    );
    Some(hv.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            os_version: Some("15.2".into()),
            chip: Some("Apple M3 Pro".into()),
            hv_support: true,
            in_vm: false,
            vm_create: Ok(()),
        }
    }

    fn failed(f: &Facts) -> Vec<(&'static str, String)> {
        verdicts(f)
            .into_iter()
            .filter_map(|(n, _, s)| match s {
                Status::Fail(fix) => Some((n, fix)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_good_mac_passes() {
        assert!(failed(&facts()).is_empty());
        assert_eq!(generation("Apple M3 Pro"), Some(3));
        assert_eq!(generation("Apple M10"), Some(10));
        assert_eq!(generation("Intel(R) Core(TM) i9"), None);
    }

    #[test]
    fn each_problem_has_its_fix() {
        let old = Facts {
            os_version: Some("14.6.1".into()),
            ..facts()
        };
        assert!(failed(&old)[0].1.contains("macOS 15"));
        let intel = Facts {
            chip: Some("Intel(R) Core(TM) i9-9980HK".into()),
            ..facts()
        };
        assert!(failed(&intel)[0].1.contains("Apple silicon"));
        let unsigned = Facts {
            vm_create: Err("hv_vm_create failed: 0xfae94007: denied (HV_DENIED): ...".into()),
            ..facts()
        };
        let f = failed(&unsigned);
        assert_eq!(f[0].0, "entitlement");
        assert!(f[0].1.contains("codesign"));
    }

    #[test]
    fn nested_virtualization_is_explained() {
        // An M2 host's guest macOS: no virtualization inside.
        let m2_guest = Facts {
            chip: Some("Apple M2".into()),
            in_vm: true,
            hv_support: false,
            ..facts()
        };
        let f = failed(&m2_guest);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].1.contains("an M2 cannot"), "{f:?}");
        // An M3 host that did not turn nesting on.
        let off = Facts {
            in_vm: true,
            hv_support: false,
            ..facts()
        };
        assert!(failed(&off)[0].1.contains("isNestedVirtualizationEnabled"));
        // Nested and working.
        let on = Facts {
            in_vm: true,
            ..facts()
        };
        assert!(failed(&on).is_empty());
    }
}
