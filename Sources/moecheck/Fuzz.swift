import ArgumentParser

struct Fuzz: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "(not yet available)")
    func run() throws { throw ToolFailure("moecheck fuzz: not implemented yet") }
}
