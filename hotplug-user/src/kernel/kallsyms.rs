//! `/proc/kallsyms`: which kernel functions exist (attach points differ between versions). Names
//! only: they are readable without CAP_SYSLOG (which addresses need), so the agent does without it.
use std::collections::HashSet;

#[derive(Debug, Default)]
pub struct Kallsyms {
    functions: HashSet<String>,
}

impl Kallsyms {
    pub fn read() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/kallsyms")?))
    }

    /// Parses `address type name [module]` lines; module symbols are included.
    pub fn parse(text: &str) -> Self {
        let mut symbols = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(_address), Some("t" | "T"), Some(name)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            symbols.functions.insert(name.to_owned());
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_functions_with_or_without_addresses() {
        let text = "ffffffff81000000 T _text\n\
                    ffffffff81a00000 T unregister_netdevice_many_notify\n\
                    ffffffff81a00100 t unbind_store\n\
                    ffffffff82e00000 D pci_bus_type\n\
                    ffffffffc0000000 t virtnet_remove\t[virtio_net]\n\
                    0000000000000000 D hidden_data\n";
        let syms = Kallsyms::parse(text);
        assert!(syms.has_function("unbind_store"));
        assert!(syms.has_function("virtnet_remove"));
        assert!(!syms.has_function("pci_bus_type"), "data is no attach point");
        assert_eq!(
            syms.first_function(&["unregister_netdevice_many_notify", "unregister_netdevice_many"]),
            Some("unregister_netdevice_many_notify")
        );
        assert_eq!(syms.first_function(&["nope"]), None);
        let hidden = Kallsyms::parse("0000000000000000 T register_netdevice\n");
        assert!(hidden.has_function("register_netdevice"), "kptr_restrict's zeros still name functions");
    }
}
