//! `/proc/kallsyms`: which kernel functions exist (attach points differ between versions). Names
//! only: they are readable without CAP_SYSLOG (which addresses need), so the agent does without it.
//!
//! The file names every symbol of the kernel and its modules (over 100,000 lines): it is read as a
//! stream and only the names asked about are kept, not a set of every function.
use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
};

#[derive(Debug, Default)]
pub struct Kallsyms {
    functions: HashSet<String>,
}

impl Kallsyms {
    /// Which of `wanted` are functions of the running kernel or its modules.
    pub fn read(wanted: &[&str]) -> std::io::Result<Self> {
        let file = std::fs::File::open("/proc/kallsyms")?;
        Self::scan(BufReader::with_capacity(64 * 1024, file), Some(wanted))
    }

    /// Parses `address type name [module]` lines; module symbols are included. Every function is
    /// kept (tests and fuzzing).
    pub fn parse(text: &str) -> Self {
        Self::scan(text.as_bytes(), None).unwrap_or_default()
    }

    /// Reads lines from `reader`, keeping the functions named in `wanted` (every one: `None`).
    /// A line that is not UTF-8 is skipped: function names are ASCII.
    fn scan(mut reader: impl BufRead, wanted: Option<&[&str]>) -> std::io::Result<Self> {
        let mut symbols = Self::default();
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(symbols);
            }
            let Ok(text) = std::str::from_utf8(&line) else { continue };
            let mut words = text.split_whitespace();
            let (Some(_address), Some("t" | "T"), Some(name)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if wanted.is_none_or(|w| w.contains(&name)) {
                symbols.functions.insert(name.to_owned());
            }
        }
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
        let wanted = Kallsyms::scan(text.as_bytes(), Some(&["unbind_store", "pci_bus_type", "absent"]))
            .unwrap_or_default();
        assert!(wanted.has_function("unbind_store"));
        assert!(!wanted.has_function("unregister_netdevice_many_notify"), "not asked about");
        assert!(!wanted.has_function("pci_bus_type") && !wanted.has_function("absent"));
        assert!(hidden.has_function("register_netdevice"), "kptr_restrict's zeros still name functions");
    }
}
