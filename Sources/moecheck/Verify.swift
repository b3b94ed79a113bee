import ArgumentParser

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "(not yet available)")
    func run() throws { throw ToolFailure("moecheck verify: not implemented yet") }
}
