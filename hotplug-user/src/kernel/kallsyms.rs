//! `/proc/kallsyms`: which kernel functions exist (attach points differ between versions) and the
//! address of `pci_bus_type`.
use std::collections::{HashMap, HashSet};

#[derive(Debug, Default)]
pub struct Kallsyms {
    functions: HashSet<String>,
    data: HashMap<String, u64>,
}

/// Data symbols the programs need the address of.
const WANTED_DATA: [&str; 1] = ["pci_bus_type"];

impl Kallsyms {
    pub fn read() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/kallsyms")?))
    }

    /// Parses `address type name [module]` lines; module symbols are included.
    pub fn parse(text: &str) -> Self {
        let mut symbols = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(address), Some(kind), Some(name)) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            match kind {
                "t" | "T" => {
                    symbols.functions.insert(name.to_owned());
                }
                _ if WANTED_DATA.contains(&name) => {
                    if let Ok(address) = u64::from_str_radix(address, 16) {
                        symbols.data.insert(name.to_owned(), address);
                    }
                }
                _ => {}
            }
        }
        symbols
    }

    pub fn has_function(&self, name: &str) -> bool {
        self.functions.contains(name)
    }

    /// The first of `candidates` this kernel has.
    pub fn first_function<'a>(&self, candidates: &[&'a str]) -> Option<&'a str> {
        candidates.iter().copied().find(|c| self.has_function(c))
    }

    /// A data symbol's address; `None` when absent or hidden (`kptr_restrict` shows zeros).
    pub fn address(&self, name: &str) -> Option<u64> {
        self.data.get(name).copied().filter(|&a| a != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_functions_and_wanted_data() {
        let text = "ffffffff81000000 T _text\n\
                    ffffffff81a00000 T unregister_netdevice_many_notify\n\
                    ffffffff81a00100 t unbind_store\n\
                    ffffffff82e00000 D pci_bus_type\n\
                    ffffffffc0000000 t virtnet_remove\t[virtio_net]\n\
                    0000000000000000 D hidden_data\n";
        let syms = Kallsyms::parse(text);
        assert!(syms.has_function("unbind_store"));
        assert!(syms.has_function("virtnet_remove"));
        assert!(!syms.has_function("pci_bus_type"));
        assert_eq!(syms.address("pci_bus_type"), Some(0xffff_ffff_82e0_0000));
        assert_eq!(
            syms.first_function(&["unregister_netdevice_many_notify", "unregister_netdevice_many"]),
            Some("unregister_netdevice_many_notify")
        );
        assert_eq!(syms.first_function(&["nope"]), None);
        let hidden = Kallsyms::parse("0000000000000000 D pci_bus_type\n");
        assert_eq!(hidden.address("pci_bus_type"), None, "kptr_restrict zeros are no address");
    }
}
