import Foundation
import MoEReference
import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// Several cases in flight (ReferencePipeline with depth > 1): references computed concurrently,
// the kernel run in order on the caller's thread, judging beside the next kernel. The reports
// must be those of a serial run, in the same order, none lost or repeated, verdicts and numbers
// (the statistical tier's included) the same bits.

/// The reports' verdicts as JSON; the statistical numbers too unless OpenBLAS's thread count was
/// set while the runs ran (GoldensTests switches it, and the oracle's statistical numbers depend
/// on it in the last bits): then the rigorous verdicts only.
private func comparable(_ runs: [[CaseReport]], settingsBefore: Int) throws -> [[String]] {
    // one form for all runs, decided once: a switch between two calls would compare the serial
    // run with its statistical numbers against a parallel run without them
    let rigorousOnly = BLAS.settingsMade != settingsBefore
    return try runs.map { reports in try reports.map { try verdictJSON($0, rigorousOnly: rigorousOnly) } }
}

@Suite("Parallel pipeline")
struct ParallelPipelineTests {
    @Test("a fuzz campaign with several cases in flight gives the serial campaign's reports, in order", arguments: [2, 5])
    func fuzzEqualsSerial(inFlight: Int) throws {
        let settings = BLAS.settingsMade
        let generator = FuzzGenerator(seed: 21, limits: .cpuModel, allExperts: true)
        var campaign = FuzzCampaign(generator: generator, verifier: CaseVerifier(kernel: try CPUModelKernel()), maxCases: 14)
        campaign.pipelined = false
        var serialIndices: [Int] = []
        let serial = campaign.run(reproducer: { _ in "" }) { ev in
            if case let .caseDone(index, _, _, _, _) = ev { serialIndices.append(index) }
        }
        campaign.pipelined = true
        campaign.inFlight = inFlight
        var indices: [Int] = [], names: [String] = []
        let parallel = campaign.run(reproducer: { _ in "" }) { ev in
            if case let .caseDone(index, report, run, _, _) = ev {
                indices.append(index)
                names.append(report.name)
                #expect(run == indices.count, "caseDone's running count")
            }
        }
        #expect(serialIndices == Array(0..<14) && indices == serialIndices, "cases lost, repeated or out of order: \(indices)")
        #expect(names == (0..<14).map { "fuzz-s21-i\($0)" })
        #expect(parallel.casesRun == serial.casesRun && parallel.failed == serial.failed && parallel.skipped == serial.skipped)
        #expect(parallel.reports.map(\.name) == serial.reports.map(\.name))
        let forms = try comparable([serial.reports, parallel.reports], settingsBefore: settings)
        #expect(forms[0] == forms[1], "the parallel campaign's reports differ from the serial one's")
        #expect(parallel.passed == serial.passed && parallel.reportsIncluded == serial.reportsIncluded)
    }

    @Test("failing verdicts of a faulty kernel are the same with cases in flight")
    func failuresEqualSerial() throws {
        let settings = BLAS.settingsMade
        let generator = FuzzGenerator(seed: 4, limits: .cpuModel, allExperts: true)
        var campaign = FuzzCampaign(generator: generator, verifier: CaseVerifier(kernel: try CPUModelKernel(fault: "expert_scaled_1p2m6")), maxCases: 10)
        campaign.maxShrinks = 0
        campaign.pipelined = false
        let serial = campaign.run(reproducer: { _ in "" })
        campaign.pipelined = true
        campaign.inFlight = 4
        let parallel = campaign.run(reproducer: { _ in "" })
        #expect(serial.failed > 0, "the fault should fail some cases")
        #expect(parallel.failed == serial.failed && parallel.reports.map(\.passed) == serial.reports.map(\.passed))
        let forms = try comparable([parallel.reports, serial.reports], settingsBefore: settings)
        #expect(forms[0] == forms[1])
    }

    @Test("a catalogue run with cases in flight keeps the cases' order, under any depth and memory budget")
    func catalogueOrder() throws {
        let settings = BLAS.settingsMade
        // big and small cases mixed, so later cases finish before earlier ones
        let cases = Catalogue.smoke().filter { $0.name.contains("q35-small") || $0.name.contains("e-equals-k") || $0.name.contains("routing-") }
        let kernel = try CPUModelKernel()
        let serial = CatalogueRun.run(cases, on: kernel, pipelined: false)
        #expect(serial.reports.map(\.name) == cases.map(\.name))
        var runs: [(depth: Int, budget: Int, reports: [CaseReport])] = []
        for (depth, budget) in [(1, Int.max), (3, Int.max), (8, Int.max), (8, 1)] {
            let run = CatalogueRun.run(cases, on: kernel, inFlight: depth, memoryBudget: budget)
            #expect(run.reports.map(\.name) == cases.map(\.name), "depth \(depth), budget \(budget): order")
            #expect(run.reports.allSatisfy { $0.waitSeconds != nil })
            runs.append((depth, budget, run.reports))
        }
        // compared in one form, decided once all runs are done: another suite may switch OpenBLAS's
        // thread count in between (the flake of 2026-12-03: the serial side compared with its
        // statistical numbers, a later run's without)
        let forms = try comparable([serial.reports] + runs.map(\.reports), settingsBefore: settings)
        for (r, form) in zip(runs, forms.dropFirst()) {
            #expect(form == forms[0], "depth \(r.depth), budget \(r.budget): verdicts")
        }
    }

    @Test("the footprint estimate grows with the case and the pipeline holds the budget")
    func footprint() throws {
        let small = try smokeCase("smoke-q35-small-bf16-T1"), big = try smokeCase("smoke-q35-small-bf16-T33")
        #expect(ReferencePipeline.footprint(small) > 0 && ReferencePipeline.footprint(big) > ReferencePipeline.footprint(small))
        // a budget below one case: one case at a time, still every case, in order
        let cases = [small, big, small, big]
        let run = CatalogueRun.run(cases, on: try CPUModelKernel(), inFlight: 4, memoryBudget: 1)
        #expect(run.reports.map(\.name) == cases.map(\.name) && run.reports.allSatisfy(\.passed))
    }
}
